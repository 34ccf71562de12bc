"""The baseline: a bare Flask route that parses a JSON body and answers it back, nothing else."""

import orjson
from flask import Flask, Response, request

app = Flask(__name__)


@app.post("/echo")
def echo():
    return Response(orjson.dumps(orjson.loads(request.get_data())), content_type="application/json")
