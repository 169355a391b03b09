"""The first thing a user does: start the server, list tools, read a file."""

from pbtest import Mcp, action


def test_in_process_server_reads_a_file(server):
    client = Mcp(server.url)
    init = client.initialize()
    assert init["serverInfo"]["name"] == "patchbay"
    result, is_error = client.call("read_file", {"path": "README.md"})
    assert not is_error
    assert result["text"].startswith("# Demo")
    status, body = action(server.url, "read_file", {"path": "README.md"})
    assert status == 200 and body["sha256"] == result["sha256"]


def test_real_process_serves_and_stops_cleanly(serve_process):
    proc = serve_process()
    client = Mcp(proc.url)
    client.initialize()
    names = [t["name"] for t in client.rpc("tools/list")["result"]["tools"]]
    assert "read_file" in names and "search" in names
    assert proc.stop() == 0
