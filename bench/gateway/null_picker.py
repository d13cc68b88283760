"""The ext_proc servicer of gateway mode with a picker that does no work (always the first pod):
what the protocol layer (grpcio aio + our servicer) costs per request, apart from the decision.

    .venv/bin/python bench/gateway/null_picker.py 127.0.0.1:9002 127.0.0.1:8001
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Mapping

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from vllm_llmd.gateway.extproc import ExtProcServicer
from vllm_llmd.gateway.picker import Pick


class NullPicker:
    def __init__(self, endpoint: str) -> None:
        self.endpoints = [endpoint]

    async def pick(self, path: str, headers: Mapping[str, str], body: bytes) -> Pick:
        return Pick(self.endpoints)

    def on_response_headers(self, pick: Pick, status: int, served: str | None) -> Mapping[str, str]:
        return {}

    def on_first_byte(self, pick: Pick) -> None:
        pass

    def on_response_data(self, pick: Pick, data: bytes) -> None:
        pass

    def on_response_end(self, pick: Pick, complete: bool) -> None:
        pass


async def serve(addr: str, endpoint: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 17 << 20)])
    pb_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(NullPicker(endpoint), 16 << 20), server)
    server.add_insecure_port(addr)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    gc.freeze()
    uvloop.run(serve(sys.argv[1], sys.argv[2]))
