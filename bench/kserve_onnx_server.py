"""The peer of `make bench`: KServe's Python ModelServer serving an ONNX file with
onnxruntime over the Open Inference Protocol v2 (REST only, no gRPC).

    python kserve_onnx_server.py --model_name magika --model_path model.onnx \
        --http_port 8080 [--intra_op_threads 0]

One process, one uvicorn worker. `--intra_op_threads 0` (the default) leaves
onnxruntime's own choice (one thread per physical core); `predict` is synchronous,
so KServe runs one inference at a time on its event loop and onnxruntime spreads
each one over its intra-op threads. Listens on 127.0.0.1 only: KServe 0.21 hard-codes
0.0.0.0 for uvicorn, so `uvicorn.Config` is wrapped below to force the host.
"""

import argparse
import uuid

import numpy as np
import onnxruntime as ort
import uvicorn

# kserve parses sys.argv when imported (parse_known_args), so our flags pass through.
import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

_Config = uvicorn.Config


class _LocalConfig(_Config):
    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = _LocalConfig
import kserve.protocol.rest.server as _rest  # noqa: E402

_rest.uvicorn.Config = _LocalConfig


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str, intra_op_threads: int):
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        self.input_types = {
            i.name: np.int32 if "int32" in i.type else np.float32
            for i in self.session.get_inputs()
        }
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None):
        feeds = {
            tensor.name: tensor.as_numpy().astype(self.input_types[tensor.name])
            for tensor in payload.inputs
        }
        outputs = self.session.run(None, feeds)
        infer_outputs = []
        for meta, value in zip(self.session.get_outputs(), outputs):
            out = InferOutput(
                name=meta.name, shape=list(value.shape), datatype="FP32"
            )
            out.set_data_from_numpy(value.astype(np.float32), binary_data=False)
            infer_outputs.append(out)
        # The JSON handler needs a string id.
        return InferResponse(
            response_id=str(payload.id or uuid.uuid4()),
            model_name=self.name,
            infer_outputs=infer_outputs,
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--http_port", type=int, required=True)
    parser.add_argument("--intra_op_threads", type=int, default=0)
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path, args.intra_op_threads)
    kserve.ModelServer(http_port=args.http_port, workers=1, enable_grpc=False).start(
        [model]
    )


if __name__ == "__main__":
    main()
