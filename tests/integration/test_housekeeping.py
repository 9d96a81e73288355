"""`inventory-worker prune`: only published outbox rows and idempotency keys past their age go."""

from __future__ import annotations

import json
import subprocess
import sys

from ..private_stack import private_settings
from ..support import REPO, pg, settings_env


def test_prune_deletes_only_what_is_old_and_done(settings):
    with private_settings(settings, "prune") as s:
        with pg(s) as cur:
            cur.execute("""
                INSERT INTO outbox (message_id, routing_key, body, created_at, published_at)
                SELECT gen_random_uuid(), 'inventory.adjusted', '{}', now() - g * interval '1 day',
                       CASE WHEN g % 2 = 0 THEN now() - g * interval '1 day' END
                  FROM generate_series(0, 19) g;
                INSERT INTO processed_events (event_id, type, outcome, processed_at)
                SELECT gen_random_uuid(), 'stock.adjusted', 'adjusted', now() - g * interval '1 day'
                  FROM generate_series(0, 39) g;""")
        env = settings_env(s)
        p = subprocess.run(
            [sys.executable, "-m", "inventory_worker", "prune", "--outbox-days", "7", "--events-days", "30"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        # published and older than 7 days: days 8, 10, ..., 18; keys at least 30 days old: 30..39
        assert json.loads(p.stdout) == {"deleted": {"outbox": 6, "processed_events": 10}}
        with pg(s) as cur:
            cur.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            assert cur.fetchone()[0] == 10  # unpublished rows stay, however old
            cur.execute(
                "SELECT max(now() - created_at) < interval '8 days' FROM outbox WHERE published_at IS NOT NULL"
            )
            assert cur.fetchone()[0]
            cur.execute(
                "SELECT count(*), max(now() - processed_at) < interval '31 days' FROM processed_events"
            )
            assert cur.fetchone() == (30, True)
        p = subprocess.run(
            [sys.executable, "-m", "inventory_worker", "prune", "--events-days", "0.5"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2
