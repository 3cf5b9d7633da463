"""The test suite (a package, so that ``tests.*`` imports resolve to these files even when another
installed project, e.g. an editable Detectron2 checkout, provides a ``tests`` package)."""
