from runnel.testing import H11Client, request


def test_health_and_echo(echo_server):
    assert request(echo_server.port, "GET", "/health").json() == {"status": "ok"}
    with H11Client(echo_server.port) as client:
        reply = client.request("POST", "/echo/echo", body=b'{"prompt": "a b", "max_tokens": 3}')
        assert reply.status == 200
        assert reply.json() == {"app": "echo", "text": "a b a", "tokens": 3}
        reply = client.request("POST", "/echo/echo", body=b'{"prompt": "a b", "max_tokens": 2, "stream": true}')
        assert reply.body == b'data: {"index":0,"token":"a"}\n\ndata: {"index":1,"token":" b"}\n\ndata: {"done":true,"tokens":2}\n\n'
