lilota = Lilota(
  db_url="postgresql+psycopg://postgres:postgres@localhost:5432/lilota_sample",
  script_path="sample/myscript.py"
)
lilota.start()

task_id = lilota.schedule("hello-world")
