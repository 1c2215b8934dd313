"""The HTTP side of cola-worker: one aiohttp application, one router per
concern. Today: delivery receipts (:mod:`worker.web.receipts`); the web
console will be a second router on the same app (:mod:`worker.web.app`).

:mod:`worker.web.signing` is standard library only (the sandbox signs with it);
importing this package does not import aiohttp.
"""
