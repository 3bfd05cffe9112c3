"""``sodkd views``: grow a small unlabeled pool with synthetic views of it, for the teacher to label.

    sodkd label --input s3://bucket/pool --output s3://bucket/pool-labels --teacher T          # the pool itself
    sodkd views --input s3://bucket/pool --labels s3://bucket/pool-labels --output s3://bucket/views --count 4000
    sodkd label --input s3://bucket/views --output s3://bucket/views-labels --teacher T        # the same teacher
    # then distil from both: data.unlabeled = [{uri: .../pool, labels: .../pool-labels},
    #                                          {uri: .../views, labels: .../views-labels}]

Views are zoomed crops of pool images and, given ``--labels``, objects cut out along their teacher labels and
pasted on other pool images (:mod:`kd.views`, :mod:`cluster.views`). Settings: ``view.*`` (areas, aspect range,
paste share, matte cut) and ``objects.*`` (which labels count as one clear object) as dotted ``KEY=VALUE``
overrides, validated like every config. The same command again resumes: the draw is seeded, and the views
already written are skipped. Unreadable images are skipped and listed in ``OUTPUT/rejects.csv``; the exit code
is then 1. Each run is recorded in MLflow (``tracking.*``: uri, experiment; ``tracking.enabled=false`` for none)
with a contact sheet of the first ``sheet`` views.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of the unlabeled pool")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the views")
    p.add_argument("--count", type=int, required=True, help="how many views to make")
    p.add_argument("--labels", default=None,
                   help="what `sodkd label` wrote for --input: objects for paste views (without: zoom views only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted settings, e.g. view.paste_p=0.3 view.zoom_area=[0.3,0.7] objects.min_conf=0.8")


def run(args: argparse.Namespace) -> int:
    from cluster.views import ViewsConfig, run_views
    from jobs.errors import naming
    from kd.config import load_config

    cfg = load_config(ViewsConfig, None, args.overrides)
    with naming(input=args.input, output=args.output, labels=args.labels):
        s, run_id = run_views(args.input, args.output, args.count, labels_uri=args.labels, seed=args.seed,
                              cfg=cfg)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s.kinds.items()))
    print(f"views: {s.written} written, {s.existing} already there ({kinds}) under {s.output} in {s.wall_s:.1f} s; "
          f"sources.csv names each view's images")
    if run_id:
        print(f"mlflow run {run_id} (experiment {cfg.tracking.experiment}): counts, sources.csv, views/sheet.png")
    if s.rejected:
        print(f"views: {len(s.rejected)} unreadable image(s) skipped, listed in rejects.csv")
        return 1
    return 0
