"""TF Serving's REST predict format, so that a client written against the demo works against TF
Serving unchanged (and back).

Request (`POST /v1/models/<name>[/versions/<v>]:predict`):

    {"signature_name": "retrieve",                      # optional, default "serving_default"
     "instances": [{"image_bytes": {"b64": "..."}, "text": "make it red", "k": 10}, ...]}   # rows
    {"signature_name": "retrieve",
     "inputs": {"image_bytes": [{"b64": "..."}], "text": ["make it red"], "k": [10]}}       # columns

A signature with a single input also takes bare values (`"instances": [{"b64": "..."}]`).
Binary strings travel as `{"b64": ...}`; plain JSON strings are taken as UTF-8.

Answer: rows -> `{"predictions": [...]}`, one entry per instance: an object keyed by output name,
or, for a signature with a single output (serving_default, embed_image), the bare value.
Columns -> `{"outputs": {...}}` (or the bare value for a single output). Output strings whose
name ends in `_bytes` are sent as `{"b64": ...}`, others as text. Errors: `{"error": "..."}`
with 400 for a bad request, as TF Serving does.

Integers are checked against their input's range before they become tensors: the dtype's range,
or a narrower one the server gives (retrieve's `k`: 1 to the gallery's size), so that a value
such as 4294967299 is refused, never wrapped to 3 by an int32 conversion. Text must be valid
Unicode (a lone surrogate such as "\\ud800" cannot be encoded as UTF-8 and is refused).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from keras_irtf.demo.limits import INT_RANGES, DemoError, check_int


def _decode_value(value, dtype: str, where: str, bounds=None, name: str = ""):
    """One JSON value of the input `name` -> a Python value of the input's dtype (recursing into
    lists). `bounds` (low, high, note): the range of an integer input, else its dtype's."""
    if isinstance(value, list):
        return [_decode_value(v, dtype, f"{where}[{i}]", bounds, name) for i, v in enumerate(value)]
    if dtype == "string":
        if isinstance(value, dict):
            if set(value) != {"b64"} or not isinstance(value["b64"], str):
                raise DemoError(f'{where}: a binary value must be written {{"b64": "<base64 text>"}}, got {value}')
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise DemoError(f"{where}: the b64 value is not valid base64") from None
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:
                raise DemoError(f"{where}: the text is not valid Unicode (it holds a lone surrogate such as "
                                f"\\ud800)") from None
        raise DemoError(f'{where}: expected a string or {{"b64": ...}}, got {type(value).__name__}')
    if dtype.startswith(("int", "uint")):
        low, high = INT_RANGES.get(dtype, (0, -1))
        note = f" ({dtype})"
        if bounds is not None:
            low, high, note = max(low, bounds[0]), min(high, bounds[1]), bounds[2]
        return check_int(value, where, low, high, note, name)
    if dtype.startswith("float") or dtype in ("half", "bfloat16"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DemoError(f"{where}: expected a number, got {value!r}")
        return value
    if dtype == "bool":
        if not isinstance(value, bool):
            raise DemoError(f"{where}: expected true or false, got {value!r}")
        return value
    raise DemoError(f"{where}: inputs of type {dtype} are not supported by this server")


def parse_predict_request(body, signatures: dict, max_instances: int, int_bounds=None):
    """(signature name, columns {input name: list over the batch}, row_format) of a predict body.

    `signatures` maps names to keras_irtf.demo.served.SignatureInfo; `int_bounds` maps
    (signature name, input name) to the (low, high, note) range of an integer input, checked
    before any cast (keras_irtf.demo.limits.k_range for retrieve's k)."""
    int_bounds = int_bounds or {}
    if not isinstance(body, dict):
        raise DemoError("the request body must be a JSON object with 'instances' or 'inputs'")
    name = body.get("signature_name", "serving_default")
    if not isinstance(name, str):
        raise DemoError("'signature_name' must be a string")
    if name not in signatures:
        raise DemoError(f'Serving signature name: "{name}" not found in signature def '
                        f'(this model has: {", ".join(sorted(signatures))})')
    inputs = signatures[name].inputs
    if ("instances" in body) == ("inputs" in body):
        raise DemoError("Missing 'inputs' or 'instances' key" if "instances" not in body
                        else "the request has both 'instances' and 'inputs': send one of them")
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise DemoError("'instances' must be a non-empty list (one entry per query)")
        if len(rows) > max_instances:
            raise DemoError(f"{len(rows)} instances in one request; this server takes up to {max_instances}",
                            status=413)
        columns = {n: [] for n in inputs}
        for i, row in enumerate(rows):
            if len(inputs) == 1 and not (isinstance(row, dict) and set(row) == set(inputs)):
                row = {next(iter(inputs)): row}  # a bare value for the single input
            if not isinstance(row, dict):
                raise DemoError(f"instances[{i}] must be an object with the inputs {list(inputs)}")
            missing = [n for n in inputs if n not in row]
            unknown = [n for n in row if n not in inputs]
            if missing or unknown:
                raise DemoError(f"instances[{i}]: signature {name} takes {list(inputs)}"
                                + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
            for n, t in inputs.items():
                columns[n].append(_decode_value(row[n], t.dtype, f"instances[{i}].{n}", int_bounds.get((name, n)), n))
        return name, columns, True

    cols = body["inputs"]
    if len(inputs) == 1 and not (isinstance(cols, dict) and set(cols) == set(inputs)):
        cols = {next(iter(inputs)): cols}
    if not isinstance(cols, dict):
        raise DemoError(f"'inputs' must be an object with the inputs {list(inputs)}")
    missing = [n for n in inputs if n not in cols]
    unknown = [n for n in cols if n not in inputs]
    if missing or unknown:
        raise DemoError(f"inputs: signature {name} takes {list(inputs)}"
                        + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    columns = {}
    for n, t in inputs.items():
        value = cols[n]
        if not isinstance(value, list):
            raise DemoError(f"inputs.{n} must be a list (one value per query)")
        if len(value) > max_instances:
            raise DemoError(f"{len(value)} values in inputs.{n}; this server takes up to {max_instances}", status=413)
        columns[n] = _decode_value(value, t.dtype, f"inputs.{n}", int_bounds.get((name, n)), n)
    return name, columns, False


def _encode(value, binary: bool):
    """Nested lists from ndarray.tolist() -> JSON values (bytes as text, or b64 for _bytes outputs)."""
    if isinstance(value, list):
        return [_encode(v, binary) for v in value]
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")} if binary else value.decode("utf-8", "replace")
    return value


def format_predict_response(outputs: dict, row_format: bool) -> dict:
    """numpy outputs (name -> [B, ...]) -> the JSON answer TF Serving gives for them."""
    names = sorted(outputs)
    encoded = {n: _encode(np.asarray(outputs[n]).tolist(), n.endswith("_bytes")) for n in names}
    if not row_format:
        return {"outputs": encoded[names[0]] if len(names) == 1 else encoded}
    batch = len(next(iter(encoded.values())))
    if len(names) == 1:
        return {"predictions": encoded[names[0]]}
    return {"predictions": [{n: encoded[n][i] for n in names} for i in range(batch)]}
