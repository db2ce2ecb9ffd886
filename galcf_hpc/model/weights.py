"""torchvision's VGG16 ImageNet file: where it is cached and how it is downloaded.

``galcf-hpc weights fetch`` downloads it with ``torch.hub.download_url_to_file`` (sha256
prefix checked, written under a temporary name and moved into place only when complete)
into the torch hub cache, ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` (by default
``~/.cache/torch/hub/checkpoints``), where torchvision would put it too and where
:func:`galcf_hpc.model.vgg.load_vgg16` looks when ``model.vgg_weights`` is not set.
Compute nodes usually have no internet: fetch on a login node (same $HOME and TORCH_HOME)
or copy the file over.
"""

import logging
import os
import socket
import urllib.error
from pathlib import Path

import torch

from ..errors import DataError

log = logging.getLogger("galcf_hpc")

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision's file names carry the first 8 hex digits of the file's sha256.
VGG16_SHA256_PREFIX = "397923af"
VGG16_FILENAME = "vgg16-397923af.pth"


def cached_vgg16_path():
    """Where the torch hub cache keeps the file (honours $TORCH_HOME); it may not exist."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def fetch_hint(path):
    """What to do when the file at ``path`` is missing or unusable."""
    return (
        f"run `galcf-hpc weights fetch --out {path}` on a machine with internet (e.g. a "
        f"login node; or `curl -o {path} {VGG16_URL}`), copy the file here and set "
        f"model.vgg_weights to its path"
    )


def fetch_vgg16(out=None, url=VGG16_URL, timeout=60):
    """Download the VGG16 ImageNet weights; returns the path written.

    ``out``: file path, or an existing directory (the file is then named
    ``vgg16-397923af.pth`` inside it); ``None`` is the torch hub cache
    (:func:`cached_vgg16_path`). The sha256 of the download must start with
    :data:`VGG16_SHA256_PREFIX`; a failed or interrupted download leaves no file behind and
    an existing file untouched.
    """
    dst = cached_vgg16_path() if out is None else Path(os.fspath(out)).expanduser()
    if dst.is_dir():
        dst = dst / VGG16_FILENAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    # download_url_to_file has no timeout: without one, a firewall that drops packets
    # (common on compute nodes) hangs the command instead of failing it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=VGG16_SHA256_PREFIX, progress=True)
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"downloading {url} failed with HTTP {exc.code} ({exc.reason}); nothing was written to "
            f"{dst}. Check the URL or download {VGG16_FILENAME} by hand (`curl -o {dst} {VGG16_URL}`)"
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {url}: {reason}. This machine probably has no internet (compute "
            f"nodes usually do not). Download the file on a login node or any machine with "
            f"internet, e.g. `galcf-hpc weights fetch --out {dst}` there or `curl -o {dst} {url}`, "
            f"then copy it here and set model.vgg_weights to its path."
        ) from exc
    except RuntimeError as exc:
        if "invalid hash value" not in str(exc):
            raise
        raise DataError(
            f"downloaded {url}, but {exc}: the download is corrupt or not torchvision's "
            f"{VGG16_FILENAME}; nothing was written to {dst}. Try again or download it by hand "
            f"(`curl -o {dst} {url}`) and check `sha256sum` starts with {VGG16_SHA256_PREFIX}."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    log.info("wrote %s (%d bytes, sha256 %s...)", dst, dst.stat().st_size, VGG16_SHA256_PREFIX)
    return str(dst)
