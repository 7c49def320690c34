"""TPC-H Q1, whole (DuckDB) and split into a per-chunk part and a reduce (minibatch)."""

from __future__ import annotations

import datetime

Q1_COLUMNS = (
    "l_returnflag",
    "l_linestatus",
    "l_quantity",
    "l_extendedprice",
    "l_discount",
    "l_tax",
    "l_shipdate",
)
Q1_SHIPDATE_MAX = datetime.date(1998, 9, 2)  # DATE '1998-12-01' - INTERVAL 90 DAY
Q1_KEYS = ("l_returnflag", "l_linestatus")
Q1_VALUES = (
    "sum_qty",
    "sum_base_price",
    "sum_disc_price",
    "sum_charge",
    "avg_qty",
    "avg_price",
    "avg_disc",
    "count_order",
)

Q1_WHOLE = """
SELECT l_returnflag, l_linestatus,
       sum(l_quantity) AS sum_qty,
       sum(l_extendedprice) AS sum_base_price,
       sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price,
       sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge,
       avg(l_quantity) AS avg_qty,
       avg(l_extendedprice) AS avg_price,
       avg(l_discount) AS avg_disc,
       count(*) AS count_order
FROM {source}
WHERE l_shipdate <= DATE '1998-09-02'
GROUP BY l_returnflag, l_linestatus
ORDER BY l_returnflag, l_linestatus
"""

Q1_CHUNK = """
SELECT l_returnflag, l_linestatus,
       sum(l_quantity) AS sum_qty,
       sum(l_extendedprice) AS sum_base_price,
       sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price,
       sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge,
       sum(l_discount) AS sum_disc,
       count(*) AS count_order
FROM chunk
WHERE l_shipdate <= DATE '1998-09-02'
GROUP BY l_returnflag, l_linestatus
"""

Q1_REDUCE = """
SELECT l_returnflag, l_linestatus,
       sum(sum_qty) AS sum_qty,
       sum(sum_base_price) AS sum_base_price,
       sum(sum_disc_price) AS sum_disc_price,
       sum(sum_charge) AS sum_charge,
       sum(sum_qty) / sum(count_order) AS avg_qty,
       sum(sum_base_price) / sum(count_order) AS avg_price,
       sum(sum_disc) / sum(count_order) AS avg_disc,
       sum(count_order) AS count_order
FROM parts
GROUP BY l_returnflag, l_linestatus
ORDER BY l_returnflag, l_linestatus
"""


def q1_over_files(files: list[str]) -> str:
    """Q1 reading the given Parquet files directly."""
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return Q1_WHOLE.format(source=f"read_parquet([{listed}])")
