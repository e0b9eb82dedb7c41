"""Crossbar.io clients from PyPI, driven by broker-cli/tests/it/crossbar.rs.

Subcommands (each prints JSON lines on stdout):

  push URL TOPIC ARGS_JSON KWARGS_JSON [KEY SECRET]
      crossbarhttprequests' Client publishes; prints {"id": ...} or {"error": ..., "status": ...}.
  signed-checks URL KEY SECRET TOPIC
      Requests signed byte for byte as Crossbar's server verifies them
      (crossbar/bridge/rest/common.py): a good one, a wrong signature, a stale timestamp
      and a replayed nonce; prints {"case": ..., "status": ..., "body": ...} per request.
  subscribe WS_URL REALM AUTHID TICKET COUNT TOPIC [PREFIX]
      An Autobahn (asyncio) session subscribes to TOPIC (exact) and PREFIX (match=prefix),
      prints {"ready": true} once subscribed, then {"sub": ..., "args": ..., "kwargs": ...,
      "topic": ..., "publication": ...} per event, and exits after COUNT events.
  publish WS_URL REALM AUTHID TICKET TOPIC ARGS_JSON KWARGS_JSON
      An Autobahn session publishes with acknowledge=True and prints {"publication": id}.
"""

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import random
import sys

import requests


def out(obj):
    print(json.dumps(obj), flush=True)


def crossbar_signature(key, secret, timestamp, seq, nonce, body):
    """HMAC[SHA256]_{secret}(key | timestamp | seq | nonce | body), URL-safe base64,
    exactly as Crossbar's _CommonResource._render_request recomputes it."""
    hm = hmac.new(secret.encode(), None, hashlib.sha256)
    for part in (key, timestamp, seq, nonce):
        hm.update(part.encode())
    hm.update(body)
    return base64.urlsafe_b64encode(hm.digest()).decode()


def push(url, topic, args, kwargs, key=None, secret=None):
    import crossbarhttp

    class Py3SigningClient(crossbarhttp.Client):
        # crossbarhttprequests 0.1.6 signs with str arguments, which Python 3's hmac
        # refuses; the same computation on bytes (everything else is the library's).
        def _compute_signature(self, body):
            timestamp = datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            )
            nonce = random.randint(0, 2**53)
            sig = crossbar_signature(
                self.key, self.secret, timestamp, str(self.sequence), str(nonce), body.encode()
            )
            return sig, nonce, timestamp

    client = (
        Py3SigningClient(url, key=key, secret=secret)
        if key
        else crossbarhttp.Client(url)
    )
    try:
        out({"id": client.publish(topic, *args, transport_path="", **kwargs)})
    except crossbarhttp.ClientBaseException as e:
        out({"error": str(e), "kind": type(e).__name__})


def signed_checks(url, key, secret, topic):
    body = json.dumps({"topic": topic, "args": ["signed"], "kwargs": {"n": 1}}).encode()

    def send(case, timestamp, seq, nonce, signature=None):
        sig = signature or crossbar_signature(key, secret, timestamp, seq, nonce, body)
        params = {"timestamp": timestamp, "seq": seq, "nonce": nonce, "signature": sig, "key": key}
        r = requests.post(url, params=params, data=body, headers={"Content-Type": "application/json"})
        out({"case": case, "status": r.status_code, "body": r.json()})

    now = datetime.datetime.now(datetime.timezone.utc)
    ts = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    nonce = str(random.randint(0, 2**53))
    send("good", ts, "1", nonce)
    send("replayed", ts, "1", nonce)
    send("wrong-signature", ts, "2", str(random.randint(0, 2**53)),
         signature=crossbar_signature(key, "not-the-secret", ts, "2", "7", body))
    stale = (now - datetime.timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    send("stale", stale, "3", str(random.randint(0, 2**53)))
    micro = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    send("microseconds", micro, "4", str(random.randint(0, 2**53)))
    send("empty-nonce", ts, "5", "")


def session(ws_url, realm, authid, ticket, main):
    from autobahn.asyncio.component import Component, run

    auth = {"ticket": {"authid": authid, "ticket": ticket}} if authid else None
    comp = Component(
        transports=[{"type": "websocket", "url": ws_url, "max_retries": 0,
                     "serializers": ["json"]}],
        realm=realm,
        authentication=auth,
    )
    comp.on_join(main)
    run([comp], log_level="warn")


def subscribe(ws_url, realm, authid, ticket, count, topic, prefix=None):
    from autobahn.wamp.types import SubscribeOptions

    async def main(s, details):
        seen = 0

        def handler(*args, **kwargs):
            nonlocal seen
            d = kwargs.pop("details")
            out({"sub": d.subscription.id, "topic": d.topic, "publication": d.publication,
                 "args": list(args), "kwargs": kwargs})
            seen += 1
            if seen >= count:
                s.leave()

        subs = [await s.subscribe(handler, topic, options=SubscribeOptions(details=True))]
        if prefix:
            subs.append(await s.subscribe(
                handler, prefix, options=SubscribeOptions(match="prefix", details=True)))
        out({"ready": True, "session": details.session, "subs": [x.id for x in subs]})

    session(ws_url, realm, authid, ticket, main)


def publish(ws_url, realm, authid, ticket, topic, args, kwargs):
    from autobahn.wamp.types import PublishOptions

    async def main(s, details):
        pub = await s.publish(topic, *args, options=PublishOptions(acknowledge=True), **kwargs)
        out({"publication": pub.id})
        s.leave()

    session(ws_url, realm, authid, ticket, main)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "push":
        push(rest[0], rest[1], json.loads(rest[2]), json.loads(rest[3]), *rest[4:6])
    elif cmd == "signed-checks":
        signed_checks(*rest)
    elif cmd == "subscribe":
        subscribe(rest[0], rest[1], rest[2], rest[3], int(rest[4]), rest[5], *rest[6:7])
    elif cmd == "publish":
        publish(*rest[:5], json.loads(rest[5]), json.loads(rest[6]))
    else:
        sys.exit(f"unknown command {cmd}")
