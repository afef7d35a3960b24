"""A model reload reaches every worker: announced by Redis pub/sub on the online store.

With several uvicorn workers sharing one port (LOOPFM_WORKERS), `POST
/admin/models/{name}/reload` reaches the one worker that accepted its connection. That
worker reloads and checks the model as before, then PUBLISHes the model's name on its Feast
project's channel (`loopfm:{project}:reload`). Every other subscribed worker reloads the
model of that name from its own configured path (the same checks, the same atomic swap)
and PUBLISHes its outcome on `loopfm:{project}:reloaded`; the announcing worker collects
those answers, up to `REPLY_WAIT_S`, for its response. PUBLISH returns how many
subscribers received the message, so the announcer knows how many answers to wait for.

Why pub/sub on the online store: every worker already holds a connection to it, one message
carries the model's name and its answers carry each worker's new version or refusal, and it
needs nothing from the process manager. It also reaches workers of other servers on the same
store: every server hosting a model of that name reloads it from its own path, so a deploy
that flips the model link on each host calls reload once. The alternatives: a watch of the
model folder polls, and nobody hears a refusal; a signal to uvicorn's supervisor (SIGHUP)
restarts every worker, with cold item caches, and a refused model leaves a worker that
cannot start. A worker that is disconnected from Redis when a reload is announced misses it
(the announcer reports it as unconfirmed); it keeps its model until the next reload.

The announcement itself (subscribe, publish) has the store's per-call time-out, as every
Redis call of a request: a paused or unreachable store makes the announcer answer at once
that nobody else was told (`error`), never hang the admin request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Callable

import orjson
import redis
import redis.asyncio

from loopfm.contract.redis_url import cluster_node_url
from serving.models import ModelRefused, ModelRegistry

log = logging.getLogger("uvicorn.error")
REPLY_WAIT_S = 30.0  # longest wait for the other workers' answers (a reload loads and dry-runs a graph)
CLIENT_NAME = "loopfm-reloads"  # CLIENT LIST shows the subscriber connection under this name


def worker_id() -> str:
    """host:pid, unique among the workers of every server on one store."""
    return f"{socket.gethostname()}:{os.getpid()}"


def channels(project: str) -> tuple[str, str]:
    """(announcements, answers) of one Feast project."""
    return f"loopfm:{project}:reload", f"loopfm:{project}:reloaded"


class ReloadBroadcast:
    """One per worker: a subscriber that reloads on others' announcements, and `announce`.
    `on_refused(name, reason)` is called when an announced model is refused here."""

    def __init__(self, redis_url: str, timeout_s: float, models: ModelRegistry, on_refused: Callable[[str, str], None]):
        # Its own connections: a subscriber blocks on read with no time-out, outside the
        # request pool's cap. A cluster forwards PUBLISH to every node: the startup node serves.
        url = cluster_node_url(redis_url) or redis_url
        self._client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=timeout_s, client_name=CLIENT_NAME)
        self._timeout_s = timeout_s  # bound of each announcing call (subscribe, publish)
        self._models, self._on_refused = models, on_refused
        self._projects = sorted({hosted.scorer.meta["project"] for hosted in models.models.values()})
        self._subscriber = self._client.pubsub(ignore_subscribe_messages=True)
        self._task: asyncio.Task | None = None
        self.worker = worker_id()

    async def start(self) -> None:
        """Subscribe (a store that does not answer is logged and retried in the background),
        then listen."""
        try:
            await self._subscriber.subscribe(*(channels(p)[0] for p in self._projects))
        except (redis.RedisError, OSError) as exc:
            log.warning("model reloads from other workers not heard yet (store unreachable: %s); retrying", exc)
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._subscriber.aclose()
        await self._client.aclose()

    async def _listen(self) -> None:
        backoff = 1.0
        while True:
            try:
                if not self._subscriber.subscribed:
                    await self._subscriber.subscribe(*(channels(p)[0] for p in self._projects))
                message = await self._subscriber.get_message(timeout=None)
            except (redis.RedisError, OSError) as exc:
                log.warning("reload channel: %s; reconnecting in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if message is not None and message["type"] == "message":
                await self._answer(orjson.loads(message["data"]))

    async def _answer(self, announcement: dict) -> None:
        if announcement["worker"] == self.worker:
            return
        name = announcement["model"]
        answer: dict = {"id": announcement["id"], "worker": self.worker}
        if name not in self._models.models:
            answer["hosted"] = False  # another server's model: answered so that nobody waits
        else:
            try:
                answer["previous_version"], answer["model_version"] = await self._models.reload(name)
                log.info("model %s reloaded on announcement from %s: %s", name, announcement["worker"], answer["model_version"])
            except ModelRefused as exc:
                answer["refused"] = str(exc)
                self._on_refused(name, str(exc))
                log.warning("model %s announced by %s refused here: %s", name, announcement["worker"], exc)
        try:
            await self._client.publish(channels(announcement["project"])[1], orjson.dumps(answer))
        except (redis.RedisError, OSError) as exc:
            log.warning("reload answer for %s not sent: %s", name, exc)

    async def announce(self, name: str) -> dict:
        """Tell every other worker to reload `name`; return {"workers": {id: answer}, where
        an answer holds model_version (and previous_version) or refused, "unconfirmed": how
        many that heard it did not answer within REPLY_WAIT_S, "error": why nobody was told
        (the store failed or did not answer a call within its time-out)}."""
        project = self._models.scorer(name).meta["project"]
        announcement = {"id": uuid.uuid4().hex, "worker": self.worker, "model": name, "project": project}
        answers: dict[str, dict] = {}
        replies = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self._timeout_s):
                await replies.subscribe(channels(project)[1])  # before announcing: no answer is missed
            async with asyncio.timeout(self._timeout_s):
                heard = await self._client.publish(channels(project)[0], orjson.dumps(announcement))
            expected = heard - 1 if self._subscriber.subscribed else heard  # its own subscriber heard it too
            loop = asyncio.get_running_loop()
            deadline = loop.time() + REPLY_WAIT_S
            received = 0
            while received < expected and (left := deadline - loop.time()) > 0:
                message = await replies.get_message(timeout=left)
                if message is None or message["type"] != "message":
                    continue
                answer = orjson.loads(message["data"])
                if answer.pop("id") != announcement["id"]:
                    continue
                received += 1
                if answer.pop("hosted", True):
                    answers[answer.pop("worker")] = answer
        except TimeoutError:
            return {"workers": answers, "unconfirmed": None,
                    "error": f"announcement failed: the store did not answer within {self._timeout_s} s"}  # fmt: skip
        except (redis.RedisError, OSError) as exc:
            return {"workers": answers, "unconfirmed": None, "error": f"announcement failed: {exc}"}
        finally:
            await replies.aclose()
        return {"workers": answers, "unconfirmed": expected - received}
