from services.evaluator.service import SPEC
from services.runtime.server import serve

serve(SPEC)
