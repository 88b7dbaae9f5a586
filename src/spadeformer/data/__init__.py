"""spadeformer.data"""
