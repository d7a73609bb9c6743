"""transact"""
