import requests

# 1. 提交任务
def submit_task(code, timeout=300):
    url = "http://localhost:8000/submit"
    payload = {
        "code": code,
        "timeout": timeout
    }
    response = requests.post(url, json=payload)
    return response.json()

# 2. 查询状态
def get_task_status(task_id):
    url = f"http://localhost:8000/status/{task_id}"
    response = requests.get(url)
    return response.json()

# 3. 获取系统状态
def get_system_stats():
    url = "http://localhost:8000/stats"
    response = requests.get(url)
    return response.json()

# 使用示例
if __name__ == "__main__":
    # 提交计算任务
    result = submit_task("print(1 + 1)")
    task_id = result["task_id"]
    print(f"任务提交成功，ID: {task_id}")
    
    # 等待并检查结果
    import time
    while True:
        status = get_task_status(task_id)
        if status["status"] == "completed":
            print(f"任务完成，结果: {status['result']}")
            break
        time.sleep(1)
