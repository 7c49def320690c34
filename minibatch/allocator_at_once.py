"""Preloaded by the forkserver, before pyarrow, for a run under a tight budget
(admission.frees_at_once): the workers' jemalloc hands every freed page back to the OS at once,
in every arena, its main one included (`jemalloc_set_decay_ms` reaches only arenas made after
it). Measured on the huge-row-group data: 5.5-6.1 x the budget above idle without, 2.2-3.6 x
with; it costs map_light's kind of job ~24%, so runs with room to spare do without."""

import os

os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
