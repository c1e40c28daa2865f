import aiohttp


async def test_proxies_json_and_sse(make_gateway, upstream):
    g = await make_gateway([{"name": "headers", "config": {"response": {"X-Test": "1"}}}])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions",
                          json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            assert r.headers["X-Test"] == "1"
            body = await r.json()
            assert body["choices"][0]["message"]["content"].endswith("hi")
        async with s.get(g.admin_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(g.admin_url + "/metrics") as r:
            assert r.status == 401
