"""hpcdistill.tasks"""
