"""A TCP proxy that can hold a client's requests in the network.

Usage: slow_proxy.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT FLAG_FILE DELAY_SECONDS

While FLAG_FILE exists, every chunk the client sends is delivered to the
upstream DELAY_SECONDS after the proxy read it (answers flow back at once):
a stalled network path that still delivers what was sent, late. The
two-writer test uses it to put an old leader's write on the wire and let it
arrive after another replica took over.
"""
import asyncio
import os
import sys
import time

listen_port, up_host, up_port, flag, delay = (
    int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))


async def deliver(queue, writer):
    """Writes queued chunks to `writer`, each when it is due."""
    try:
        while True:
            deliver_at, data = await queue.get()
            if data is None:
                break
            wait = deliver_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                print(f"delivered {len(data)} bytes held {wait:.1f}s", file=sys.stderr, flush=True)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def client_reader(reader, queue, hold=True):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            held = delay if hold and os.path.exists(flag) else 0.0
            await queue.put((time.monotonic() + held, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))


async def downstream(reader, writer):
    """Answers flow back at once: a queue whose chunks are due now."""
    queue = asyncio.Queue()
    task = asyncio.ensure_future(deliver(queue, writer))
    await client_reader(reader, queue, hold=False)
    await task


async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection(up_host, up_port)
    except OSError:
        cw.close()
        return
    queue = asyncio.Queue()
    await asyncio.gather(client_reader(cr, queue), deliver(queue, uw), downstream(ur, cw))


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
