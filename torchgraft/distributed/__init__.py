"""torchgraft.distributed"""
