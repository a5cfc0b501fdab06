"""What the daemon tells its operators while it runs: /healthz and Prometheus /metrics over HTTP.

- `metrics.py`: the counters, and the collector that reads the mailboxes' state and the last database
  probe at scrape time. Counters are incremented where the event is committed: the intake once per
  committed batch (`Pipeline.recorded`), the outbox sender's process over its pipe after each commit of
  outcomes, the SLA check after its transactions. No database query and no lock per mail.
- `health.py`: the probe (one grouped read of the outbox on a connection of its own) and the verdict.
- `server.py`: the aiohttp endpoint on the daemon's event loop.
"""
