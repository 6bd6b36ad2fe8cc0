"""Access to the Hugging Face hub: one quick probe before a hub download, and the offline hint.

Why a probe: datasets and transformers retry for ~25 s when the hub is unreachable; one HEAD request with a
short timeout makes a run without network fail in seconds with a hint instead.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request

from offline_resources import OFFLINE_MODELS, OFFLINE_TEXTS

HUB_PROBE_TIMEOUT_S = 3.0  # one probe; datasets/transformers themselves retry for ~25 s when offline
_HUB_PROBE: dict[str, str] = {}  # endpoint -> "" (reachable) or why not, once per process


class HubUnreachable(ValueError):
    """The Hugging Face hub cannot be reached (or offline mode is on) and a hub resource was asked for."""


def hub_offline_mode() -> bool:
    """True when the user asked the HF libraries to stay offline (they then fail fast on their own)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_hint() -> str:
    return (f"offline, use a model alias ({', '.join(OFFLINE_MODELS)}) or a local checkpoint dir and the offline "
            f"texts ({', '.join(OFFLINE_TEXTS)}, or text:PATH); with the resource already in your "
            "Hugging Face cache, set HF_HUB_OFFLINE=1")


def check_hub_reachable(what: str) -> None:
    """Probe the hub endpoint once (HUB_PROBE_TIMEOUT_S) before a hub download, so no access fails in
    seconds with a hint instead of after the libraries' retries. Raises HubUnreachable.

    Skipped under HF_HUB_OFFLINE (the libraries then read only their cache, without retries). Any HTTP
    answer, even an error status, counts as reachable."""
    if hub_offline_mode():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if endpoint not in _HUB_PROBE:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"),
                                   timeout=HUB_PROBE_TIMEOUT_S).close()
            _HUB_PROBE[endpoint] = ""
        except urllib.error.HTTPError:
            _HUB_PROBE[endpoint] = ""
        except (OSError, ValueError) as exc:  # URLError, timeout, refused, bad URL
            reason = getattr(exc, "reason", exc)
            _HUB_PROBE[endpoint] = f"{type(reason).__name__}: {str(reason)[:120]}"
    if _HUB_PROBE[endpoint]:
        raise HubUnreachable(f"{what} needs the Hugging Face hub, unreachable at {endpoint} "
                             f"({_HUB_PROBE[endpoint]}); {offline_hint()}")
