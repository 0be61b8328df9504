"""The HTTP client behind every upstream attempt, kept behind one small interface.

An attempt is a request in and a classified `Outcome` out, whose response body is
still to be read or streamed (`UpstreamResponse`). Nothing above this package sees
a client library's types or exceptions: the client (our own HTTP/1.1 one on asyncio
protocols and llhttp, `http11/`, which replaced aiohttp's for CPU per request) can
change without touching the pipeline, the proxied route or the checkout.
"""

from proxy.client.protocol import BrokenBody, HttpClient, OutgoingRequest, UpstreamResponse

__all__ = ["BrokenBody", "HttpClient", "OutgoingRequest", "UpstreamResponse"]
