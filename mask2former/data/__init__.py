from .catalog import DatasetCatalog, Metadata, MetadataCatalog, thing_contiguous_ids

__all__ = ["DatasetCatalog", "Metadata", "MetadataCatalog", "thing_contiguous_ids"]
