"""Log lines as text for people or as JSON objects for a log pipeline.

Every line carries the id of the request that caused it ("-" for none); see
web.middlewares.RequestIdFilter. Nothing here adds data to a record: what is
logged is what the code chose to log, and no code logs a secret.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from .web.middlewares import RequestIdFilter

# Libraries that log credentials at DEBUG (botocore: each signed request's
# Authorization header, with the access key id): never below INFO.
CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    floor = max(logging.getLevelName(level), logging.INFO)
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(floor)
