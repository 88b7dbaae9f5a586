"""spadeformer.models"""
