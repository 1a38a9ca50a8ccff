from nfhooks import Policy

policy = Policy()
limits = {"a": 1}
print(limits["b"])
