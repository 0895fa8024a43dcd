"""``telecare bench``: ingest throughput and alarm latency, with baselines from the same run.

One run measures, on the configured services (or the real PostgreSQL and Mosquitto on
127.0.0.1 when they answer, else embedded ones):

* sustained ingest of single-event messages and of 500-event envelopes: rows committed
  over time, read from the hub's own ``telecare_events_ingested_total``, from the first
  publish to the last commit;
* telemetry publish → committed latency, and pendant press → alarm row latency, under a
  paced background of 2,000 events/s;
* baselines in the same run, with the same publisher and payloads: publish-only to the
  broker (the publisher's ceiling), a bare aiomqtt subscriber that only counts, the MQTT
  hop latency at 2,000 msg/s, and PostgreSQL COPY binary of event rows;
* where the time goes: CPU per event of every process involved, the hub's histograms,
  and a py-spy profile of the hub when ``py-spy`` is installed;
* how the broker treats the hub's MQTT 5 Receive Maximum and manual acknowledgement.

The hub runs as its own process (``python -m hub hub``) on a scratch database
``telecare_bench_<random>``, dropped at the end, so the publisher and the hub never share
an event loop or a GIL. The results are written between two markers in the output file
(docs/benchmarks.md); whatever else that file holds is kept.

Flow control: Mosquitto keeps at most ``max_queued_messages`` (1,000 by default) QoS 1
messages per client beyond those in flight and silently drops the rest, while the
publisher still gets its PUBACK. An open-loop publisher faster than the hub would lose
events, so throughput runs are closed-loop: the publisher keeps at most a window of
messages ahead of what the subscriber (the hub, or the bare baseline subscriber) has
taken, and the fraction of time it waited for that window says who set the pace.
"""

from hub.bench.command import run_bench

__all__ = ["run_bench"]
