"""hpcdistill.distill"""
