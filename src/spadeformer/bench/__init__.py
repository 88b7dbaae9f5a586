"""spadeformer.bench"""
