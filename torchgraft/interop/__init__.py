"""torchgraft.interop"""
