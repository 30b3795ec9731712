"""A small web app for Keg: answers on $PORT with a greeting from the keg-greeting package.

Its config comes from the environment: `keg config set hello GREETING_NAME=you`.
"""

import http.server
import os

from keg_greeting import greet

MESSAGE = "release one"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{greet(os.environ.get('GREETING_NAME', 'Keg'))} This is {MESSAGE}.\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(self.address_string(), fmt % args, flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print(f"listening on port {port}", flush=True)
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
