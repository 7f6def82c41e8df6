"""Many simulated agents in one process, for bench/reconnect_storm.py.

    python bench/_swarm.py URL TOKENS_JSON [one-address]

TOKENS_JSON maps cluster ids to resume tokens.  Each simulated agent
connects with its token, says hello, keeps the resume token hpcd gives it
in ``welcome``, and after a drop reconnects with it, backing off like the
real agent (0.5 s, doubling, at most 8 s).  Prints ``welcomed N T`` each
time all N are welcomed (T: seconds since the first of them was lost, or
since start), and ``lost`` when the first one is lost.  Each connects from
an address of its own in 127.0.0.0/8, as clusters do from their own hosts;
with ``one-address`` all come from 127.0.0.1 (clusters behind one NAT), so
hpcd's HPC_PREAUTH_MAX_PER_ADDRESS paces their handshakes.
"""

import json
import random
import sys
import time

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor

url, tokens = sys.argv[1], json.load(open(sys.argv[2]))
one_address = sys.argv[3:] == ["one-address"]
welcomed = set()
state = {"since": time.monotonic()}


class Sim(WebSocketClientProtocol):
    def onOpen(self):
        self.sendMessage(json.dumps({
            "type": "hello", "protocol": 1, "agent_version": "sim", "scheduler": "sim",
            "hostname": "sim", "nvx": True}).encode())

    def onMessage(self, payload, is_binary):
        message = json.loads(payload)
        if message.get("type") == "welcome":
            self.factory.token = message["resume_token"]
            self.factory.delay = 0.5
            welcomed.add(self.factory.cluster)
            if len(welcomed) == len(tokens):
                print(f"welcomed {len(welcomed)} {time.monotonic() - state['since']:.2f}",
                      flush=True)

    def onClose(self, was_clean, code, reason):
        if self.factory.cluster in welcomed:
            welcomed.discard(self.factory.cluster)
            if len(welcomed) == len(tokens) - 1:
                state["since"] = time.monotonic()
                print("lost", flush=True)
        self.factory.retry()


class SimFactory(WebSocketClientFactory):
    protocol = Sim

    def __init__(self, cluster, token, number):
        super().__init__(f"{url}/agent")
        self.cluster, self.token, self.delay = cluster, token, 0.5
        self.source = None if one_address else (
            f"127.{number // 62500 % 250 + 1}.{number // 250 % 250}.{number % 250 + 1}", 0)
        self.setProtocolOptions(openHandshakeTimeout=15, autoPingInterval=0)

    def connect(self):
        self.headers = {"Authorization": f"Bearer {self.token}"}
        host, port = url.split("//")[1].split(":")
        reactor.connectTCP(host, int(port), self, timeout=15, bindAddress=self.source)

    def clientConnectionFailed(self, connector, reason):
        self.retry()

    def retry(self):
        delay, self.delay = self.delay, min(self.delay * 2, 8.0)
        reactor.callLater(delay * random.uniform(0.8, 1.2), self.connect)


for number, (cluster, token) in enumerate(tokens.items()):
    SimFactory(cluster, token, number).connect()
reactor.run()
