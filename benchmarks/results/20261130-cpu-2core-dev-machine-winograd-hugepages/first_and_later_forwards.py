import time, os
t0 = time.perf_counter()
import torch, glcic_fast
from glcic_fast.inference.bench import DEMO_WEIGHTS
t1 = time.perf_counter()
net = glcic_fast.load(DEMO_WEIGHTS).eval(); x = torch.rand(1, 4, 512, 512)
t2 = time.perf_counter()
ts = []
with torch.inference_mode():
    for _ in range(8):
        s = time.perf_counter(); net(x); ts.append(time.perf_counter() - s)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), "import %.2f load %.2f" % (t1 - t0, t2 - t1), " ".join("%.0f" % (t * 1e3) for t in ts))
