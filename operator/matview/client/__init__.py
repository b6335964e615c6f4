"""Reading views from applications: the fallback chooser, keyset pages, data versions and change signals.

This package is what an application imports. It needs psycopg and nothing else: no kopf, no Kubernetes
client, no operator code (``tests/unit/test_layers.py`` holds it to that, and a test imports it in a
process and looks at what got loaded). Every statement it sends is written for a database where other
roles may have planted look-alike functions and operators in a schema on the application's search_path:
functions and operators are schema-qualified, and values go in as parameters.

    from matview import client

    chooser = client.RelationChooser(("ops", "mv_payments_driver_matrix_cabinet"),
                                     ("ops", "v_payments_driver_matrix_cabinet"))
    first = client.page(conn, chooser, order=["driver_id"], limit=50)
    second = client.page(conn, chooser, order=["driver_id"], limit=50, after=first.next)
    etag = client.version(conn, ("ops", "mv_payments_driver_matrix_cabinet"))
    for change in client.listen(dsn, ["ops.mv_payments_driver_matrix_cabinet"]):
        ...  # drop the cached entries of change.keys (all of them when keys is None or change.gap)
"""

from matview.client.fallback import RelationChooser
from matview.client.pages import MAX_LIMIT, CursorError, OrderError, Page, page
from matview.client.signals import Change, listen, version

__all__ = ["MAX_LIMIT", "Change", "CursorError", "OrderError", "Page", "RelationChooser", "listen", "page", "version"]
