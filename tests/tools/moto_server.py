#!/usr/bin/env python3
"""moto_server, with S3's documented XML root element for the two
multipart listings moto 5.2 names after the operation.

S3 answers ListParts with <ListPartsResult> and ListMultipartUploads with
<ListMultipartUploadsResult> (S3 API reference); moto's generic REST-XML
serializer writes <ListPartsResponse> and <ListMultipartUploadsResponse>,
which the AWS SDK for Rust rejects ("expected ListPartsResult"). This
renames the root of those two answers and changes nothing else, so the
mirror's code runs against the shape S3 really sends. Everything else
(arguments included) is moto_server's own: `moto_server.py -H 127.0.0.1 -p N`.
"""

import sys

from moto.core import serialize

ROOTS = {
    "ListParts": "ListPartsResult",
    "ListMultipartUploads": "ListMultipartUploadsResult",
}

_original = serialize.S3Serializer._serialized_result_to_response


def _s3_roots(self, resp, result, shape, serialized_result):
    resp = _original(self, resp, result, shape, serialized_result)
    name = self.operation_model.name
    root = ROOTS.get(name)
    body = resp.get("body")
    if root and isinstance(body, str):
        wrong = f"{name}Response"
        body = body.replace(f"<{wrong}", f"<{root}", 1)
        head, sep, tail = body.rpartition(f"</{wrong}>")
        resp["body"] = head + f"</{root}>" + tail if sep else body
    return resp


serialize.S3Serializer._serialized_result_to_response = _s3_roots

if __name__ == "__main__":
    from moto.server import main

    sys.exit(main())
