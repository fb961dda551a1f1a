"""torchgraft.data"""
