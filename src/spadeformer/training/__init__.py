"""spadeformer.training"""
