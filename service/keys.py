"""Every piece of application state, typed (web.AppKey, aiohttp >= 3.9)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .auth import CachedCookieStorage, LoginThrottle, PasswordVerifier, SessionRegistry
from .config import Settings
from .delivery.worker import DeliveryWorker
from .intake import DocumentIntake
from .metrics import Metrics
from .relay_keys import RelayKeys
from .storage import S3CredentialChecker
from .store.database import Database
from .web.readiness import RevisionCheck

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
INTAKE = web.AppKey("intake", DocumentIntake)
RELAY_KEYS = web.AppKey("relay_keys", RelayKeys)
S3_CHECKER = web.AppKey("s3_checker", S3CredentialChecker)
# Set on every commit of new outbox rows; the in-process worker waits on it.
WAKE = web.AppKey("wake", asyncio.Event)
WORKER = web.AppKey("worker", DeliveryWorker)
PASSWORDS = web.AppKey("passwords", PasswordVerifier)
SESSIONS = web.AppKey("sessions", CachedCookieStorage)
METRICS = web.AppKey("metrics", Metrics)
# The Alembic revision this code expects (read once at start-up, for /readyz).
SCHEMA_HEAD = web.AppKey("schema_head", str)
SESSION_REGISTRY = web.AppKey("session_registry", SessionRegistry)
LOGIN_THROTTLE = web.AppKey("login_throttle", LoginThrottle)
READINESS = web.AppKey("readiness", RevisionCheck)
# Set on the apps served on a metrics port: /readyz shows details, /metrics is open.
STATUS_PORT = web.AppKey("status_port", bool)
