"""One engine's measurements in its own process: `python -m rgemma.bench JOB`, as `rgemma.bench.run` starts it.

Each measurement is one line on stdout, CHILD_MARK then its JSON, printed as
soon as it is measured, so that a run cut short keeps what came before.
"""

import json
import sys

import torch

from rgemma.bench.measure import CHILD_MARK, Job, measure

job = Job.from_json(sys.argv[1])
if job.threads:
    torch.set_num_threads(job.threads)
for section, fields in measure(job):
    print(CHILD_MARK + json.dumps({"section": section, **fields}), flush=True)
