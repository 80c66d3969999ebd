"""hpcdistill.record"""
