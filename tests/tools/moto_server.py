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

`-p 0` binds a free port and writes `port N` as the first line of stdout
(then nothing more there): a port chosen by the caller and freed before
this process binds it can be taken in between by any other bind or
connect on the machine, and moto takes a second or two to start.
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


def serve_on_a_free_port(host):
    """moto_server's application on a port the kernel picks, announced."""
    import os

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server(host, 0, DomainDispatcherApplication(create_backend_app), threaded=True)
    port = server.server_address[1]
    os.environ["MOTO_PORT"] = str(port)
    sys.stdout.write(f"port {port}\n")
    sys.stdout.flush()
    # The reader may stop reading after that line.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    server.serve_forever()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=None)
    known, rest = parser.parse_known_args()
    if known.port == 0 and not rest:
        serve_on_a_free_port(known.host)
    else:
        from moto.server import main

        sys.exit(main())
