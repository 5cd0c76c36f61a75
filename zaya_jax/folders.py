"""Folders that appear complete or not at all: written beside their final name, then renamed into place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator


def _permissions_as_created(folder: str) -> None:
  """The modes a plain mkdir and open would have given (the umask's): mkdtemp makes the folder private (0700),
  which would hide an export from the other users of a shared cluster."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(folder, 0o777 & ~umask)
  for name in os.listdir(folder):
    entry = os.path.join(folder, name)
    os.chmod(entry, (0o777 if os.path.isdir(entry) else 0o666) & ~umask)  # a folder keeps its x bits


def check_target(path: str | os.PathLike, *, overwrite: bool = False, own_files: tuple[str, ...] = ()) -> str:
  """The absolute path (`~` expanded), after checking that `folder_in_place` may write it (callers check before
  costly work). `own_files`: what an earlier output of the caller's kind holds, at least one of them; overwrite
  replaces only such a folder, so a mistyped path cannot delete a training run or anything else."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} is a file, not a folder")
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    if own_files and not any(os.path.exists(os.path.join(path, name)) for name in own_files):
      raise FileExistsError(f"{path} is not an earlier output of this kind (it holds none of {', '.join(own_files)}):"
                            " overwriting replaces only those; move the folder away yourself if it should go")
  return path


@contextlib.contextmanager
def folder_in_place(path: str | os.PathLike, *, overwrite: bool = False,
                    own_files: tuple[str, ...] = ()) -> Iterator[str]:
  """Yields an empty sibling folder to write into; on a clean exit it takes `path`'s name, on an error it is removed.

  An existing non-empty `path` is refused unless `overwrite` (and, given `own_files`, unless it holds one of them:
  see `check_target`). The old folder moves aside first and is deleted only
  once the new one holds the name: an error puts it back, and a crash leaves a complete folder under the name, or
  none and the old one beside it (a hidden `.<name>.old-*` sibling)."""
  path = check_target(path, overwrite=overwrite, own_files=own_files)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  old = None
  try:
    yield tmp
    _permissions_as_created(tmp)
    if overwrite and os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.replace(path, os.path.join(old, "folder"))
    try:
      # Without overwrite, a folder that another writer filled meanwhile stays: rename(2) replaces an empty
      # directory only (and takes a missing name), never a non-empty one.
      os.replace(tmp, path)
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or overwrite:
        raise
      raise FileExistsError(f"{path} was written by another process while this one ran; this one's output "
                            "was discarded") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      if not os.path.exists(path):  # moved aside, the new one not in: put it back
        os.replace(os.path.join(old, "folder"), path)
      shutil.rmtree(old, ignore_errors=True)  # empty now (or the move aside itself failed)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
