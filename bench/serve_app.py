"""The server bench/serve.py measures: the example of docs/serving.md, with the model and the threads per
worker taken from the environment (SERVE_MODEL, SERVE_WEIGHTS, SERVE_THREADS).

    SERVE_THREADS=1 .venv/bin/uvicorn serve_app:app --app-dir bench --workers 2 --port 8000
"""

import io
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from npmobile.applications.mobilenet_v2 import decode_predictions, preprocess_input
from npmobile.batch import ModelRef
from npmobile.errors import ImageError
from npmobile.image import load_img
from npmobile.kernels.backend import AOT

THREADS = int(os.environ.get("SERVE_THREADS", "1"))  # Numba threads per worker
MAX_PIXELS = 40_000_000  # a 40-megapixel photo; larger uploads are refused from their header, before decoding
model = None
warmup_seconds = None


def classify_bytes(data: bytes) -> list[dict]:
    x = load_img(io.BytesIO(data), target_size=model.input_shape[1:3], max_pixels=MAX_PIXELS)
    probabilities = model.predict(preprocess_input(x[None]), threads=THREADS)
    return [{"wnid": wnid, "label": label, "probability": float(p)}
            for wnid, label, p in decode_predictions(probabilities, top=5)[0]]


@asynccontextmanager
async def lifespan(app: FastAPI):
    global model, warmup_seconds
    # Seeded random weights by default: the same work as ImageNet's, and no download.
    model = ModelRef(os.environ.get("SERVE_MODEL", "mobilenet_v2"), os.environ.get("SERVE_WEIGHTS", "none")).open()
    started = time.perf_counter()
    model.warmup(threads=THREADS)  # every kernel loaded (or compiled) before uvicorn accepts a connection
    blank = io.BytesIO()
    Image.new("RGB", (64, 64)).save(blank, "JPEG")
    await run_in_threadpool(classify_bytes, blank.getvalue())  # and a request's path once: JPEG decoder, labels
    warmup_seconds = time.perf_counter() - started
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/health")
def health() -> dict:
    return {"ready": model is not None, "pid": os.getpid(), "kernels": "aot" if AOT else "jit",
            "warmup_s": round(warmup_seconds, 3)}


@app.post("/classify")
async def classify(request: Request) -> dict:
    data = await request.body()
    try:  # decoding and predict off the event loop (predict calls run one at a time per process)
        top = await run_in_threadpool(classify_bytes, data)
    except ImageError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None
    return {"pid": os.getpid(), "top": top}
