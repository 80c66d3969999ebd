"""hpcdistill.spec"""
