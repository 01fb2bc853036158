from lilota.worker import LilotaWorker

worker = LilotaWorker(
  db_url="postgresql+psycopg://postgres:postgres@localhost:5432/lilota_sample"
)

@worker.register("hello-world")
def hello_world():
  print("Hello World")
