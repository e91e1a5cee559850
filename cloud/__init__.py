"""The cloud half of cdcca: server, teacher, AKD distillation and DWC compression. Owns torch."""
