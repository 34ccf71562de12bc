"""One POST to a checked destination, connecting to the address that was vetted (not a fresh DNS lookup).

urllib3 is used directly because it lets us connect to an IP address while sending the host name in the
Host header and in TLS (SNI and certificate check); a pooled requests.Session would resolve the name again.
Redirects are not followed and every read and connect has a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import certifi
import urllib3
from urllib3.exceptions import ConnectTimeoutError

from app.webhooks.addresses import Destination

MAX_ADDRESSES = 3  # addresses tried when connecting fails (nothing was sent, so trying the next is safe)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None


def _pool(destination: Destination, address: str, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
    common = {"port": destination.port, "timeout": timeout, "retries": False, "maxsize": 1}
    if destination.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            address,
            server_hostname=destination.host,
            assert_hostname=destination.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            **common,
        )
    return urllib3.HTTPConnectionPool(address, **common)


def post(destination: Destination, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST ``body``; the receiver's status and Retry-After. Raises urllib3's errors (timeouts, connection,
    TLS) for the caller to classify; the response body is never read."""
    limits = urllib3.Timeout(connect=timeout, read=timeout)
    headers = {**headers, "host": destination.host_header}
    last_error = ConnectTimeoutError("no address to connect to")
    for address in destination.addresses[:MAX_ADDRESSES]:
        pool = _pool(destination, address, limits)
        try:
            response = pool.urlopen(
                "POST",
                destination.target,
                body=body,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
            try:
                return Answer(response.status, response.headers.get("retry-after"))
            finally:
                response.close()
        except ConnectTimeoutError as exc:  # refused or timed out while connecting: the request was not sent
            last_error = exc
        finally:
            pool.close()
    raise last_error
