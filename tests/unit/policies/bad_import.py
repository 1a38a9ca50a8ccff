from nfhooks import Policy
import nfhooks_no_such_module  # noqa: F401

policy = Policy()
